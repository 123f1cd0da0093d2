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
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	provider "sigs.k8s.io/secrets-store-csi-driver/provider/v1alpha1"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/tmpfs"
)

// csiScenario is keyward-broker serving a simulated kubelet, step by step.
type csiScenario struct {
	e       *brokerEnv
	d       *driver
	kl      *kubelet
	prod    *corev1.Pod
	dev     *corev1.Pod
	target  string
	payload string
}

func TestCSIDriverPublishesIntoTmpfs(t *testing.T) {
	e := newBrokerEnv(t)
	d := startDriver(t, e, driverOptions{provider: true})
	s := &csiScenario{e: e, d: d, kl: d.kl, prod: e.pods["payments-prod"], dev: e.pods["payments-dev"]}
	runSteps(t,
		step{"kubelet's plugin watcher finds the driver's registration socket", s.registration},
		step{"a publish mounts a tmpfs with the files", s.publishIntoTmpfs},
		step{"the provider API returns the same files and refuses the same attacks", s.providerMatches},
		step{"fsGroup owns the files", s.fsGroup},
		step{"refused publishes leave nothing", s.refusedLeaveNothing},
		step{"Vault tokens live only while their pod has a volume", s.tokensFollowVolumes},
		step{"rotation reaches the file, never partially", s.rotation},
		step{"a restarted driver serves republish", s.restart},
		step{"a deleted pod's files are cleared", s.deletedPod},
		step{"a revoked grant clears the files", s.revokedGrant},
		step{"no secret outside the tmpfs mounts", s.noSecretOutside},
		step{"unpublish leaves nothing and the audit verifies", s.unpublishAndAudit},
	)
}

// registration plays kubelet's plugin watcher against the driver's registration socket: the driver
// says who it is and where kubelet reaches it, and takes kubelet's answer.
func (s *csiScenario) registration(t *testing.T) {
	conn, err := grpc.NewClient("unix://"+filepath.Join(s.d.registry, csi.DriverName+"-reg.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	reg := registerapi.NewRegistrationClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := reg.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil || info.GetType() != registerapi.CSIPlugin || info.GetName() != csi.DriverName ||
		info.GetEndpoint() != "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock" || strings.Join(info.GetSupportedVersions(), ",") != "1.0.0" {
		t.Fatalf("GetInfo: %v %v", info, err)
	}
	if _, err := reg.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
}

func (s *csiScenario) publishIntoTmpfs(t *testing.T) {
	info, err := s.kl.id.GetPluginInfo(context.Background(), &csipb.GetPluginInfoRequest{})
	if err != nil || info.Name != csi.DriverName {
		t.Fatalf("plugin info %v %v", info, err)
	}
	s.target = s.kl.target(t, s.prod)
	if err := s.kl.publish(t, s.prod, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	if ok, err := tmpfs.IsTmpfs(s.target); err != nil || !ok {
		t.Fatalf("target is not a tmpfs: %v", err)
	}
	if got := readFile(t, filepath.Join(s.target, "db-password")); got != prodCanary {
		t.Fatalf("db-password = %q", got)
	}
	for name, mode := range map[string]os.FileMode{"db-password": 0o400, "ca.crt": 0o444} {
		st, err := os.Stat(filepath.Join(s.target, name))
		if err != nil || st.Mode().Perm() != mode {
			t.Fatalf("%s mode %v (%v), want %v", name, st.Mode().Perm(), err, mode)
		}
	}
	s.payload, _ = os.Readlink(filepath.Join(s.target, "..data"))
	if err := s.kl.publish(t, s.prod, csiSecrets, ""); err != nil {
		t.Fatalf("idempotent publish: %v", err)
	}
	if again, _ := os.Readlink(filepath.Join(s.target, "..data")); again != s.payload {
		t.Fatal("an unchanged republish rewrote the files")
	}
}

func (s *csiScenario) providerMatches(t *testing.T) {
	pconn, err := grpc.NewClient("unix://"+s.d.providerSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer pconn.Close()
	prov := provider.NewCSIDriverProviderClient(pconn)
	mount := func(pod *corev1.Pod, secrets string) (*provider.MountResponse, error) {
		tok, err := s.e.kube.PodToken(context.Background(), pod, []string{audience}, 10*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		tokens, _ := json.Marshal(map[string]map[string]string{audience: {"token": tok}})
		attrs, _ := json.Marshal(map[string]string{"secretProviderClass": "payments", csi.AttrSecrets: secrets,
			csi.AttrTokens: string(tokens), csi.AttrPodName: pod.Name, csi.AttrPodNamespace: pod.Namespace,
			csi.AttrPodUID: string(pod.UID), csi.AttrSAName: pod.Spec.ServiceAccountName})
		return prov.Mount(context.Background(), &provider.MountRequest{Attributes: string(attrs), TargetPath: "/ignored", Permission: "420"})
	}
	resp, err := mount(s.prod, csiSecrets)
	if err != nil {
		t.Fatalf("provider Mount: %v", err)
	}
	onDisk, _ := tmpfs.Read(s.target)
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
	if _, err := mount(s.e.pods["other-prod"], "- {ref: payments-prod/db, key: password, file: pw}"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("provider: another namespace's ref: %v", err)
	}
	if _, err := mount(s.prod, "- {ref: ../dev/payments-dev/db, key: password, file: pw}"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("provider: traversal: %v", err)
	}
}

func (s *csiScenario) fsGroup(t *testing.T) {
	if err := s.kl.publish(t, s.dev, "- {ref: payments-dev/db, key: password, file: pw}\n", "4242"); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(s.kl.target(t, s.dev), "pw"))
	if err != nil || st.Sys().(*syscall.Stat_t).Gid != 4242 || st.Mode().Perm() != 0o440 {
		t.Fatalf("fsGroup file: %v %v", st, err)
	}
}

func (s *csiScenario) refusedLeaveNothing(t *testing.T) {
	freshDev := s.e.newPod(t, "payments-dev", "api-1")
	freshProd := s.e.newPod(t, "payments-prod", "api-2")
	other := s.e.pods["other-prod"]
	for name, tc := range map[string]struct {
		pod     *corev1.Pod
		secrets string
		code    codes.Code
		msg     string
	}{
		"another namespace's ref":  {other, "- {ref: payments-prod/db, key: password, file: pw}", codes.PermissionDenied, "no grant"},
		"dev pod, prod namespace":  {freshDev, "- {ref: payments-prod/db, key: password, file: x}", codes.PermissionDenied, "no grant"},
		"bad entry":                {other, "- {ref: other-prod/db, key: password, file: a/b}", codes.InvalidArgument, "secrets[0]"},
		"traversal":                {other, "- {ref: ../prod/db, key: password, file: x}", codes.InvalidArgument, "secrets[0]"},
		"unknown field":            {other, "- {ref: other-prod/db, key: password, file: x, owner: root}", codes.InvalidArgument, "unknown field"},
		"duplicate file":           {other, "- {ref: other-prod/db, key: password, file: x}\n- {ref: other-prod/db, key: password, file: x}", codes.InvalidArgument, "used twice"},
		"no grant":                 {other, "- {ref: other-prod/nope, key: password, file: x}", codes.PermissionDenied, ""},
		"granted but not in Vault": {freshProd, "- {ref: payments-prod/db, key: password, file: a}\n- {ref: payments-prod/nope, key: password, file: b}", codes.NotFound, "not found"},
		"granted, key missing":     {freshProd, "- {ref: payments-prod/db, key: nokey, file: a}", codes.NotFound, "no key"},
	} {
		err := s.kl.publish(t, tc.pod, tc.secrets, "")
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
			t.Errorf("%s: %v, want %s mentioning %q", name, err, tc.code, tc.msg)
		}
		if _, serr := os.Stat(s.kl.target(t, tc.pod)); !os.IsNotExist(serr) {
			t.Errorf("%s: a refused publish left %s behind", name, s.kl.target(t, tc.pod))
		}
	}
	s.e.pods["fresh-prod"] = freshProd
}

// Vault tokens live only while a pod of their service account has a volume: the two published pods
// (two namespaces) hold one each; the failed first publishes logged in and released theirs; a second
// pod of a published pod's service account shares its token, and unpublishing it leaves the token to
// the first (the last pod's release revokes it: revokedGrant).
func (s *csiScenario) tokensFollowVolumes(t *testing.T) {
	wantPodTokens(t, s.e.vault, 2, "only the published pods hold Vault tokens")
	fresh := s.e.pods["fresh-prod"]
	if err := s.kl.publish(t, fresh, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	wantPodTokens(t, s.e.vault, 2, "a second pod of the service account shares its token")
	if err := s.kl.unpublish(t, fresh); err != nil {
		t.Fatal(err)
	}
	wantPodTokens(t, s.e.vault, 2, "unpublishing one of the service account's pods leaves the token to the other")
}

// Rotation in Vault reaches the file on republish; a reader never sees partial content.
func (s *csiScenario) rotation(t *testing.T) {
	var reads, bad atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var valid sync.Map
	valid.Store(prodCanary, true)
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			b, err := os.ReadFile(filepath.Join(s.target, "db-password"))
			reads.Add(1)
			if _, ok := valid.Load(string(b)); err != nil || !ok {
				bad.Add(1)
			}
		}
	})
	for i := range 10 {
		v := fmt.Sprintf("%s-rotated-%d-%s", prodCanary, i, strings.Repeat("x", 2000))
		valid.Store(v, true)
		if _, err := s.e.vault.PutKV(context.Background(), "kv", "prod/payments-prod/db", map[string]any{"password": v}); err != nil {
			t.Fatal(err)
		}
		if err := s.kl.publish(t, s.prod, csiSecrets, ""); err != nil {
			t.Fatal(err)
		}
		if got := readFile(t, filepath.Join(s.target, "db-password")); got != v {
			t.Fatalf("after rotation %d the file holds %.40q", i, got)
		}
	}
	close(stop)
	wg.Wait()
	if bad.Load() != 0 || reads.Load() < 10 {
		t.Fatalf("%d of %d reads during the swaps saw partial or missing content", bad.Load(), reads.Load())
	}
	t.Logf("%d reads during 10 swaps, none partial", reads.Load())
}

// A restarted driver finds its published volumes again (tmpfs mount points) and keeps serving
// republish: no state is lost with the process. The stopped one revoked the Vault tokens it held.
func (s *csiScenario) restart(t *testing.T) {
	s.d.proc.stop(t)
	wantPodTokens(t, s.e.vault, 0, "a stopped driver revoked its pods' tokens")
	s.d.restart(t)
	if _, err := s.e.vault.PutKV(context.Background(), "kv", "prod/payments-prod/db", map[string]any{"password": prodCanary}); err != nil {
		t.Fatal(err)
	}
	payload, _ := os.Readlink(filepath.Join(s.target, "..data"))
	if err := s.kl.publish(t, s.prod, csiSecrets, ""); err != nil {
		t.Fatalf("republish after a driver restart: %v", err)
	}
	if got := readFile(t, filepath.Join(s.target, "db-password")); got != prodCanary {
		t.Fatalf("after restart the file holds %.40q", got)
	}
	if again, _ := os.Readlink(filepath.Join(s.target, "..data")); again == payload {
		t.Fatal("the restarted driver did not swap in the changed secret")
	}
}

// A deleted pod: kubelet republishes with the token it has; once the apiserver invalidates it and
// the pod is confirmed gone, the files are cleared.
func (s *csiScenario) deletedPod(t *testing.T) {
	devTok, err := s.e.kube.PodToken(context.Background(), s.dev, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	zero := int64(0)
	if err := s.e.kube.Client.CoreV1().Pods("payments-dev").Delete(context.Background(), s.dev.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "deleted pod's republish refused", func() error {
		if err := s.kl.publishWith(t, s.dev, devTok, "- {ref: payments-dev/db, key: password, file: pw}\n", "4242"); status.Code(err) != codes.Unauthenticated {
			return fmt.Errorf("republish: %v", err)
		}
		return nil
	})
	if files, err := tmpfs.Read(s.kl.target(t, s.dev)); err != nil || len(files) != 0 {
		t.Fatalf("files left for a deleted pod: %d %v", len(files), err)
	}
}

// Revocation: the grant goes away; the next republish is refused and clears the files.
func (s *csiScenario) revokedGrant(t *testing.T) {
	os.WriteFile(s.d.policy, []byte(strings.Replace(brokerPolicy, `paths: ["payments-prod/*", "shared/tls/*"]`, `paths: ["payments-prod/other/*"]`, 1)), 0o600)
	eventually(t, 10*time.Second, "revoked grant refused on republish", func() error {
		err := s.kl.publish(t, s.prod, csiSecrets, "")
		if status.Code(err) == codes.PermissionDenied {
			return nil
		}
		return fmt.Errorf("republish: %v", err)
	})
	if files, err := tmpfs.Read(s.target); err != nil || len(files) != 0 {
		t.Fatalf("files left after revocation: %d %v", len(files), err)
	}
	wantPodTokens(t, s.e.vault, 0, "revoked and deleted pods hold no Vault token")
}

// Everything the test and the driver wrote outside the tmpfs mounts is free of the secrets.
func (s *csiScenario) noSecretOutside(t *testing.T) {
	var scanned int
	for _, root := range []string{s.d.dir, s.e.kube.Dir, s.e.vault.Dir} {
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
}

// Unpublish leaves nothing and is idempotent; the audit chain verifies and holds no token.
func (s *csiScenario) unpublishAndAudit(t *testing.T) {
	for _, p := range []*corev1.Pod{s.prod, s.dev} {
		for range 2 {
			if err := s.kl.unpublish(t, p); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := os.Stat(s.kl.target(t, p)); !os.IsNotExist(err) {
			t.Fatalf("unpublish left %s: %v", s.kl.target(t, p), err)
		}
	}
	if mps, _ := tmpfs.MountsUnder(s.kl.root); len(mps) != 0 {
		t.Fatalf("mounts left after unpublish: %v", mps)
	}
	s.d.proc.stop(t)
	if _, err := os.Stat(s.d.sock); !os.IsNotExist(err) {
		t.Fatal("socket left after SIGTERM")
	}
	if code, out := ctl(t, nil, "audit", "verify", s.d.auditLog, "--key-file", s.d.key); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
	audit := readFile(t, s.d.auditLog)
	for _, want := range []string{`"event":"mount"`, `"event":"unmount"`, `"event":"policy_reload"`, `"code":"PermissionDenied"`} {
		if !strings.Contains(audit, want) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	logs := readFile(t, s.d.proc.log)
	if !strings.Contains(logs, `"token_present":true`) {
		t.Error("the driver log does not show the sanitized publish requests")
	}
	if strings.Contains(logs, "eyJ") || strings.Contains(audit, "eyJ") {
		t.Error("a JWT reached the driver log or the audit log")
	}
}
