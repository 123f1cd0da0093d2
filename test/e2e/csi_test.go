package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	provider "sigs.k8s.io/secrets-store-csi-driver/provider/v1alpha1"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/test/harness"
)

// kubelet is a simulated kubelet: it calls the driver as kubelet does for an inline ephemeral volume,
// with a real pod-bound token from TokenRequest.
type kubelet struct {
	t    *testing.T
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
func (k *kubelet) target(pod *corev1.Pod) string {
	p := filepath.Join(k.root, "pods", string(pod.UID), "volumes/kubernetes.io~csi/secrets/mount")
	if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
		k.t.Fatal(err)
	}
	return p
}

func (k *kubelet) publish(pod *corev1.Pod, secrets string, fsGroup string) error {
	k.t.Helper()
	tok, err := k.e.kube.PodToken(context.Background(), pod, []string{audience}, 10*time.Minute)
	if err != nil {
		k.t.Fatal(err)
	}
	return k.publishWith(pod, tok, secrets, fsGroup)
}

func (k *kubelet) publishWith(pod *corev1.Pod, tok, secrets, fsGroup string) error {
	k.t.Helper()
	tokens, _ := json.Marshal(map[string]map[string]string{audience: {"token": tok, "expirationTimestamp": time.Now().Add(10 * time.Minute).Format(time.RFC3339)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := k.node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{
		VolumeId:   "csi-" + string(pod.UID),
		TargetPath: k.target(pod),
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

func (k *kubelet) unpublish(pod *corev1.Pod) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := k.node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "csi-" + string(pod.UID), TargetPath: k.target(pod)})
	return err
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

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestCSIDriverPublishesIntoTmpfs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the CSI e2e test mounts tmpfs and needs root, as the node plugin does")
	}
	e := newBrokerEnv(t)
	dir := harness.Dir(t)
	policyPath := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policyPath, []byte(brokerPolicy), 0o600)
	kubeconfig, err := e.kube.WriteKubeconfig(filepath.Join(dir, "kubeconfig"), "")
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "broker.yaml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`policyFile: %s
policyReloadInterval: 200ms
tokenReviewCacheTTL: 1s
vault:
  address: %s
  allowInsecureHTTP: true
`, policyPath, e.vault.Addr)), 0o600)
	auditLog, auditKey := filepath.Join(dir, "broker-audit.log"), filepath.Join(dir, "audit.key")
	os.WriteFile(auditKey, []byte(strings.Repeat("q", 40)), 0o600)
	sock, provSock := filepath.Join(dir, "csi.sock"), filepath.Join(dir, "provider.sock")
	drv := start(t, nil, filepath.Join(dir, "keyward-broker.log"), "keyward-broker", "--csi-socket", sock, "--node-id", "node-1",
		"--kubelet-dir", filepath.Join(dir, "kubelet"), "--metrics-address", "",
		"--provider-socket", provSock,
		"--config", cfgPath, "--kubeconfig", kubeconfig, "--audit-log", auditLog, "--audit-key-file", auditKey, "--log-level", "debug")
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kl := &kubelet{t: t, e: e, node: csipb.NewNodeClient(conn), id: csipb.NewIdentityClient(conn), root: filepath.Join(dir, "kubelet")}
	t.Cleanup(func() { tmpfs.UnmountAllUnder(kl.root) }) // only matters when the test failed midway
	eventually(t, 30*time.Second, "driver ready", func() error {
		if drv.exited() {
			t.Fatalf("driver exited: %s", readFile(t, drv.log))
		}
		r, err := kl.id.Probe(context.Background(), &csipb.ProbeRequest{})
		if err != nil || !r.GetReady().GetValue() {
			return fmt.Errorf("probe %v %v", r, err)
		}
		return nil
	})
	info, err := kl.id.GetPluginInfo(context.Background(), &csipb.GetPluginInfoRequest{})
	if err != nil || info.Name != csi.DriverName {
		t.Fatalf("plugin info %v %v", info, err)
	}

	prodPod := e.pods["payments-prod"]
	target := kl.target(prodPod)
	if err := kl.publish(prodPod, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	if ok, err := tmpfs.IsTmpfs(target); err != nil || !ok {
		t.Fatalf("target is not a tmpfs: %v", err)
	}
	if got := readFile(t, filepath.Join(target, "db-password")); got != prodCanary {
		t.Fatalf("db-password = %q", got)
	}
	for name, mode := range map[string]os.FileMode{"db-password": 0o400, "ca.crt": 0o444} {
		st, err := os.Stat(filepath.Join(target, name))
		if err != nil || st.Mode().Perm() != mode {
			t.Fatalf("%s mode %v (%v), want %v", name, st.Mode().Perm(), err, mode)
		}
	}
	payload, _ := os.Readlink(filepath.Join(target, "..data"))
	if err := kl.publish(prodPod, csiSecrets, ""); err != nil {
		t.Fatalf("idempotent publish: %v", err)
	}
	if again, _ := os.Readlink(filepath.Join(target, "..data")); again != payload {
		t.Fatal("an unchanged republish rewrote the files")
	}

	// The Secrets Store CSI Driver provider API returns the same files for the same pod and refuses
	// the same attacks.
	pconn, err := grpc.NewClient("unix://"+provSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer pconn.Close()
	prov := provider.NewCSIDriverProviderClient(pconn)
	mount := func(pod *corev1.Pod, secrets string) (*provider.MountResponse, error) {
		tok, err := e.kube.PodToken(context.Background(), pod, []string{audience}, 10*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		tokens, _ := json.Marshal(map[string]map[string]string{audience: {"token": tok}})
		attrs, _ := json.Marshal(map[string]string{"secretProviderClass": "payments", csi.AttrSecrets: secrets,
			csi.AttrTokens: string(tokens), csi.AttrPodName: pod.Name, csi.AttrPodNamespace: pod.Namespace,
			csi.AttrPodUID: string(pod.UID), csi.AttrSAName: pod.Spec.ServiceAccountName})
		return prov.Mount(context.Background(), &provider.MountRequest{Attributes: string(attrs), TargetPath: "/ignored", Permission: "420"})
	}
	resp, err := mount(prodPod, csiSecrets)
	if err != nil {
		t.Fatalf("provider Mount: %v", err)
	}
	onDisk, _ := tmpfs.Read(target)
	if len(resp.Files) != len(onDisk) {
		t.Fatalf("provider returned %d files, the CSI volume has %d", len(resp.Files), len(onDisk))
	}
	for _, f := range resp.Files {
		found := false
		for _, d := range onDisk {
			found = found || (d.Name == f.Path && bytes.Equal(d.Data, f.Contents) && int32(d.Mode) == f.Mode)
		}
		if !found {
			t.Errorf("provider file %s differs from the CSI volume's", f.Path)
		}
	}
	if _, err := mount(e.pods["other-prod"], "- {ref: payments-prod/db, key: password, file: pw}"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("provider: another namespace's ref: %v", err)
	}
	if _, err := mount(prodPod, "- {ref: ../dev/payments-dev/db, key: password, file: pw}"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("provider: traversal: %v", err)
	}

	// fsGroup: the group owns the files and may read the default-mode ones.
	devPod := e.pods["payments-dev"]
	if err := kl.publish(devPod, "- {ref: payments-dev/db, key: password, file: pw}\n", "4242"); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(kl.target(devPod), "pw"))
	if err != nil || st.Sys().(*syscall.Stat_t).Gid != 4242 || st.Mode().Perm() != 0o440 {
		t.Fatalf("fsGroup file: %v %v", st, err)
	}

	// Refused publishes leave no mount and no directory.
	freshDev, err := e.kube.CreatePod(context.Background(), "payments-dev", "api-1", "api", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	freshProd, err := e.kube.CreatePod(context.Background(), "payments-prod", "api-2", "api", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		pod     *corev1.Pod
		secrets string
		code    codes.Code
		msg     string
	}{
		"another namespace's ref":  {e.pods["other-prod"], "- {ref: payments-prod/db, key: password, file: pw}", codes.PermissionDenied, "no grant"},
		"dev pod, prod namespace":  {freshDev, "- {ref: payments-prod/db, key: password, file: x}", codes.PermissionDenied, "no grant"},
		"bad entry":                {e.pods["other-prod"], "- {ref: other-prod/db, key: password, file: a/b}", codes.InvalidArgument, "secrets[0]"},
		"traversal":                {e.pods["other-prod"], "- {ref: ../prod/db, key: password, file: x}", codes.InvalidArgument, "secrets[0]"},
		"unknown field":            {e.pods["other-prod"], "- {ref: other-prod/db, key: password, file: x, owner: root}", codes.InvalidArgument, "unknown field"},
		"duplicate file":           {e.pods["other-prod"], "- {ref: other-prod/db, key: password, file: x}\n- {ref: other-prod/db, key: password, file: x}", codes.InvalidArgument, "used twice"},
		"no grant":                 {e.pods["other-prod"], "- {ref: other-prod/nope, key: password, file: x}", codes.PermissionDenied, ""},
		"granted but not in Vault": {freshProd, "- {ref: payments-prod/db, key: password, file: a}\n- {ref: payments-prod/nope, key: password, file: b}", codes.NotFound, "not found"},
		"granted, key missing":     {freshProd, "- {ref: payments-prod/db, key: nokey, file: a}", codes.NotFound, "no key"},
	} {
		err := kl.publish(tc.pod, tc.secrets, "")
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
			t.Errorf("%s: %v, want %s mentioning %q", name, err, tc.code, tc.msg)
		}
		if _, serr := os.Stat(kl.target(tc.pod)); !os.IsNotExist(serr) {
			t.Errorf("%s: a refused publish left %s behind", name, kl.target(tc.pod))
		}
	}

	// Vault tokens live only while their pod has a volume: the two published pods hold one each;
	// freshProd's failed first publishes logged in and released theirs. A published and unpublished
	// volume takes its token with it.
	wantPodTokens(t, e.vault, 2, "only the published pods hold Vault tokens")
	if err := kl.publish(freshProd, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	wantPodTokens(t, e.vault, 3, "a third published pod holds a token")
	if err := kl.unpublish(freshProd); err != nil {
		t.Fatal(err)
	}
	wantPodTokens(t, e.vault, 2, "unpublishing the pod's last volume revoked its token")

	// Rotation in Vault reaches the file on republish; a reader never sees partial content.
	var reads, bad atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	valid := map[string]bool{prodCanary: true}
	var validMu sync.RWMutex
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			b, err := os.ReadFile(filepath.Join(target, "db-password"))
			reads.Add(1)
			validMu.RLock()
			ok := err == nil && valid[string(b)]
			validMu.RUnlock()
			if !ok {
				bad.Add(1)
			}
		}
	})
	for i := range 10 {
		v := fmt.Sprintf("%s-rotated-%d-%s", prodCanary, i, strings.Repeat("x", 2000))
		validMu.Lock()
		valid[v] = true
		validMu.Unlock()
		if _, err := e.vault.PutKV(context.Background(), "kv", "prod/payments-prod/db", map[string]any{"password": v}); err != nil {
			t.Fatal(err)
		}
		if err := kl.publish(prodPod, csiSecrets, ""); err != nil {
			t.Fatal(err)
		}
		if got := readFile(t, filepath.Join(target, "db-password")); got != v {
			t.Fatalf("after rotation %d the file holds %.40q", i, got)
		}
	}
	close(stop)
	wg.Wait()
	if bad.Load() != 0 || reads.Load() < 10 {
		t.Fatalf("%d of %d reads during the swaps saw partial or missing content", bad.Load(), reads.Load())
	}
	t.Logf("%d reads during 10 swaps, none partial", reads.Load())

	// A restarted driver finds its published volumes again (tmpfs mount points) and keeps serving
	// republish: no state is lost with the process. The stopped one revoked the Vault tokens it held.
	drv.stop(t)
	wantPodTokens(t, e.vault, 0, "a stopped driver revoked its pods' tokens")
	drv = start(t, nil, filepath.Join(dir, "keyward-broker-2.log"), "keyward-broker", "--csi-socket", sock, "--node-id", "node-1",
		"--kubelet-dir", filepath.Join(dir, "kubelet"), "--metrics-address", "",
		"--config", cfgPath, "--kubeconfig", kubeconfig, "--audit-log", auditLog, "--audit-key-file", auditKey, "--log-level", "debug")
	eventually(t, 30*time.Second, "restarted driver ready", func() error {
		r, err := kl.id.Probe(context.Background(), &csipb.ProbeRequest{})
		if err != nil || !r.GetReady().GetValue() {
			return fmt.Errorf("probe %v %v", r, err)
		}
		return nil
	})
	if _, err := e.vault.PutKV(context.Background(), "kv", "prod/payments-prod/db", map[string]any{"password": prodCanary}); err != nil {
		t.Fatal(err)
	}
	payload, _ = os.Readlink(filepath.Join(target, "..data"))
	if err := kl.publish(prodPod, csiSecrets, ""); err != nil {
		t.Fatalf("republish after a driver restart: %v", err)
	}
	if got := readFile(t, filepath.Join(target, "db-password")); got != prodCanary {
		t.Fatalf("after restart the file holds %.40q", got)
	}
	if again, _ := os.Readlink(filepath.Join(target, "..data")); again == payload {
		t.Fatal("the restarted driver did not swap in the changed secret")
	}

	// A deleted pod: kubelet republishes with the token it has; once the apiserver invalidates it,
	// the files are cleared.
	devTok, err := e.kube.PodToken(context.Background(), devPod, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	zero := int64(0)
	if err := e.kube.Client.CoreV1().Pods("payments-dev").Delete(context.Background(), devPod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "deleted pod's republish refused", func() error {
		if err := kl.publishWith(devPod, devTok, "- {ref: payments-dev/db, key: password, file: pw}\n", "4242"); status.Code(err) != codes.Unauthenticated {
			return fmt.Errorf("republish: %v", err)
		}
		return nil
	})
	if files, err := tmpfs.Read(kl.target(devPod)); err != nil || len(files) != 0 {
		t.Fatalf("files left for a deleted pod: %d %v", len(files), err)
	}

	// Revocation: the grant goes away; the next republish is refused and clears the files.
	os.WriteFile(policyPath, []byte(strings.Replace(brokerPolicy, `paths: ["payments-prod/*", "shared/tls/*"]`, `paths: ["payments-prod/other/*"]`, 1)), 0o600)
	eventually(t, 10*time.Second, "revoked grant refused on republish", func() error {
		err := kl.publish(prodPod, csiSecrets, "")
		if status.Code(err) == codes.PermissionDenied {
			return nil
		}
		return fmt.Errorf("republish: %v", err)
	})
	if files, err := tmpfs.Read(target); err != nil || len(files) != 0 {
		t.Fatalf("files left after revocation: %d %v", len(files), err)
	}
	wantPodTokens(t, e.vault, 0, "revoked and deleted pods hold no Vault token")

	// Everything the test and the driver wrote outside the tmpfs mounts is free of the secrets.
	var scanned int
	for _, root := range []string{dir, e.kube.Dir, e.vault.Dir} {
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if d.IsDir() {
				if ok, _ := tmpfs.IsTmpfs(p); ok && p != root {
					return filepath.SkipDir
				}
				return nil
			}
			if !d.Type().IsRegular() {
				return nil
			}
			scanned++
			b, _ := os.ReadFile(p)
			if bytes.Contains(b, []byte(prodCanary)) || bytes.Contains(b, []byte(devValue)) {
				t.Errorf("secret found outside tmpfs in %s", p)
			}
			return nil
		})
	}
	t.Logf("scanned %d files outside the tmpfs mounts", scanned)

	// Unpublish leaves nothing, and is idempotent.
	for _, p := range []*corev1.Pod{prodPod, devPod} {
		for range 2 {
			if err := kl.unpublish(p); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := os.Stat(kl.target(p)); !os.IsNotExist(err) {
			t.Fatalf("unpublish left %s: %v", kl.target(p), err)
		}
	}
	if mps, _ := tmpfs.MountsUnder(kl.root); len(mps) != 0 {
		t.Fatalf("mounts left after unpublish: %v", mps)
	}
	drv.stop(t)
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatal("socket left after SIGTERM")
	}
	if code, out := ctl(t, nil, "audit", "verify", auditLog, "--key-file", auditKey); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
	audit := readFile(t, auditLog)
	for _, want := range []string{`"event":"mount"`, `"event":"unmount"`, `"event":"policy_reload"`, `"code":"PermissionDenied"`} {
		if !strings.Contains(audit, want) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	logs := readFile(t, drv.log)
	if !strings.Contains(logs, `"token_present":true`) {
		t.Error("the driver log does not show the sanitized publish requests")
	}
	if strings.Contains(logs, "eyJ") || strings.Contains(audit, "eyJ") {
		t.Error("a JWT reached the driver log or the audit log")
	}
}
